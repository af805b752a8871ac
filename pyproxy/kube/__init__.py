"""Kubernetes injection: one injector behind `pyproxy inject` and the admission webhook."""
