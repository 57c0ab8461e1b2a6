"""Checkpoints: ours (Megatron-LM's layout), and conversion from and to Hugging Face and
Megatron-DeepSpeed. Import from the modules themselves; this package file imports nothing.

    tensors.py             THE table: each BLOOM tensor's TP split and its name in every format
    layout.py              our directory layout: tracker, iter_N / release, mp_rank_TT[_PPP] files
    io.py                  atomic writes (temporary name or staging dir, then rename), safe reads
    save_load.py           save / load / resume during training (pretrain_bloom.py, generation)
    reshard.py             TP/PP resharding of our checkpoints (tools/convert_tp.py)
    hf_source.py           tensor sources: a Hugging Face directory, read lazily
    hf.py                  Hugging Face BloomForCausalLM <-> ours (tools/convert_checkpoint.py)
    megatron_deepspeed.py  Megatron-DeepSpeed layer files as a tensor source
"""
