"""Out of domain: a trained model on other labs' annotated images (the ``ood`` stages; issue 31).

Above importing, inference and scoring, which it combines: :mod:`cellseg.ood.score`. The figures themselves are
:mod:`cellseg.eval.ood_metrics`'.
"""
