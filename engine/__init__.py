"""engine: an image retrieval search engine built on a Siamese encoder.

Heavy modules (torch, timm, faiss) are imported by the submodules that need them, never here,
so that ``import engine`` and ``engine --help`` stay instant.
"""

__version__ = "0.1.0"
