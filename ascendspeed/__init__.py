"""AscendSpeed: Megatron-style pretraining of BLOOM with tensor, pipeline and data parallelism."""
__version__ = "0.1.0"
