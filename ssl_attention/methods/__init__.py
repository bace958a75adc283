"""Attention methods: each turns one forward pass (``passes``) into ``MapBlock``s (``blocks``).

The registry (``ssl_attention.registry``) names each method's ``compute`` function; nothing else calls them.
"""
