"""The Panel dashboard: fused and per-head attention maps over the warehouse (``panel serve dashboards/app.py``)."""
