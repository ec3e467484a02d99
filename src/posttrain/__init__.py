"""posttrain: post-training of generative models with feedback."""

__version__ = "0.1.0"
