"""medsearch: retrieval-augmented multimodal search for medical imaging archives.

The core library. It never imports the shells (api, cli) or the pipeline (indexer),
never reads the environment and never prints: configuration comes in as frozen
dataclasses (``medsearch.config``) and errors go out as ``medsearch.errors``.
"""

__version__ = "0.1.0"
