"""Weight loading and per-architecture forward adapters; what each model *is* lives in ``ssl_attention.registry``."""
