from scripts import chaos


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(base_dir):
    # a horizon long enough that the kills (3.5-5.5 s after each start) land mid-training
    train_args = [*chaos.TINY, "--num-iterations", "2000", "--save-every", "10"]  # later flags win
    equal, kills = chaos.main(["--kills", "3", "--min-seconds", "3.5", "--max-seconds", "5.5", "--", *train_args])
    assert kills >= 2  # runs really were killed mid-training (and resumed from their checkpoints)
    assert equal
