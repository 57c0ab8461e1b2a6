"""The README's checkpoint walkthrough end to end, with real processes: a Hugging Face BLOOM is
converted to TP=2 x PP=2, pretraining continues from it, the job is killed (-9) and resumed to
the same losses as an uninterrupted run, the result is resharded to TP=4 and converted back to a
Hugging Face directory that holds exactly the trained weights."""
import time

import pytest
import torch

from launch import kill_process_tree, start_torchrun
from test_convert_checkpoint import TO_HF, TO_OURS, converted
from test_pretrain import corpus, launch, losses, model_args  # noqa: F401 (corpus is a fixture)

pytestmark = pytest.mark.multiprocess


def continue_args(corpus, ckpt, *extra):
    return model_args(corpus, "--load", str(ckpt), "--save", str(ckpt), "--use-checkpoint-args",
                      "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                      "--train-iters", "6", "--save-interval", "2", "--eval-interval", "3",
                      "--eval-iters", "1", *extra)


def hf_model(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(3)
    model = BloomForCausalLM(BloomConfig(vocab_size=260, hidden_size=32, n_layer=4, n_head=4))
    model.save_pretrained(tmp_path / "hf")
    return model


def test_hf_continue_kill_resume_reshard_and_back(corpus, tmp_path):
    from tools.convert_tp import main as convert_tp
    from transformers import BloomForCausalLM

    original = hf_model(tmp_path)
    for name in ("straight", "killed"):
        converted(*TO_OURS, "--input", tmp_path / "hf", "--output", tmp_path / name,
                  "--target-tp", 2, "--target-pp", 2)
    straight = losses(launch(4, continue_args(corpus, tmp_path / "straight")))
    assert len(straight) == 6

    # The same job, killed with -9 once it has saved iteration 2 (or later), then run again.
    tracker = tmp_path / "killed" / "latest_checkpointed_iteration.txt"
    with open(tmp_path / "killed.log", "w") as output:
        process = start_torchrun("pretrain_bloom.py", continue_args(corpus, tmp_path / "killed"),
                                 4, stdout=output, stderr=output)
        deadline = time.time() + 300
        while tracker.read_text() == "release" and process.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)
        kill_process_tree(process.pid)
        process.wait(timeout=60)
    saved = int(tracker.read_text())
    assert 2 <= saved <= 6, (tmp_path / "killed.log").read_text()[-3000:]
    resumed = launch(4, continue_args(corpus, tmp_path / "killed"))
    assert f"at iteration {saved} " in resumed.stdout  # the checkpoint the tracker named
    assert losses(resumed) == straight[saved:], resumed.stdout[-3000:]  # bitwise (as printed)

    # Reshard to TP=4 (PP=1), then back to Hugging Face.
    assert convert_tp(["--input-folder", str(tmp_path / "killed"), "--output-folder",
                       str(tmp_path / "tp4"), "--target-tp", "4"]) == 0
    converted(*TO_HF, "--input", tmp_path / "tp4", "--output", tmp_path / "hf_continued")
    converted(*TO_HF, "--input", tmp_path / "straight", "--output", tmp_path / "hf_straight")
    continued = BloomForCausalLM.from_pretrained(tmp_path / "hf_continued").state_dict()
    reference = BloomForCausalLM.from_pretrained(tmp_path / "hf_straight").state_dict()
    assert set(continued) == set(reference) == set(original.state_dict())
    for name, tensor in reference.items():
        assert torch.equal(continued[name], tensor), name  # the trained weights, exactly
    embedding = "transformer.word_embeddings.weight"
    assert continued[embedding].shape == (260, 32)  # the HF vocabulary rows, kept
    assert not torch.equal(continued[embedding], original.state_dict()[embedding])  # trained
