"""mixflow: a distributed data-pipeline augmentation engine.

Sharded datasets stream through DALI decoding into Ray actors that apply batch
mixing augmentations and feed PyTorch trainer ranks through credit-based channels.
The pure cores (:mod:`mixflow.mix`, :mod:`mixflow.mixture`) never import Ray;
:mod:`mixflow.runtime` is the only package that does.
"""

__version__ = "0.1.0"
