"""rlrec: turn interaction logs into a generative recommender by post-training a language model."""

__version__ = "0.1.0"


def load(path_or_repo_id, device=None, revision=None):
    """A published stage (local folder or Hub repo id) as a `Recommender`: `rlrec.load(x).recommend(history, k)`."""
    from rlrec.recommender import load as _load

    return _load(path_or_repo_id, device=device, revision=revision)
