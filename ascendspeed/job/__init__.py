"""What keeps a long job honest about itself: one job per checkpoint directory (lock), a status
file an operator or tools/pulse.py can read (heartbeat), and workers that stop when their
launcher is gone (launcher)."""
