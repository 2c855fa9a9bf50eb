"""bd3: block diffusion language models (BD3-LMs, Arriola et al., ICLR 2025).

Importing the package does nothing beyond defining names: no logging set-up, no folders,
no torch flags. The command line lives in :mod:`bd3.cli`.
"""

__version__ = "0.1.0"
