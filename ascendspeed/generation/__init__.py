"""Text generation from a BLOOM checkpoint under tensor and pipeline parallelism, with a
key/value cache: sampling.py (greedy, temperature, top-k, top-p), generate.py (the loop, on token
ids or text), loading.py (checkpoint -> this rank's stage)."""
from ascendspeed.errors import PromptError
from ascendspeed.generation.generate import Generation, StageRunner, generate_text, generate_tokens
from ascendspeed.generation.sampling import SamplingParams, sample

__all__ = ["Generation", "PromptError", "SamplingParams", "StageRunner", "generate_text",
           "generate_tokens", "sample"]
