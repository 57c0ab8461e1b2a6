"""Pipeline parallelism: `partition` (which layers each stage and chunk holds; pure, so the
flags can be checked before any process group), `p2p_communication` (activations and gradients
between adjacent stages) and `schedules` (Megatron's no-pipelining, 1F1B and interleaved 1F1B)."""
