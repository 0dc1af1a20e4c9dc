"""The serving-engine plumbing that needs no engine: the greedy comparison's near-tie rule, and
a missing engine environment is a one-line error naming the command that makes it."""

from __future__ import annotations

import pytest

from megapuzzle.errors import UserError
from megapuzzle.serving.engines import require_python
from megapuzzle.serving.reference import compare_greedy


def test_greedy_comparison_tells_near_ties_from_mismatches():
    want = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    margins = [[1.0, 1.0, 1.0, 1.0], [1.0, 5e-5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    got = [[1, 2, 3, 4], [5, 0, 0, 0], [9, 9, 0, 9]]  # equal; a near-tie at step 1; a real mismatch at step 2
    res = compare_greedy(got, want, margins, tie=1e-4)
    assert res["equal_tokens"] == 4 + 1 + 2 and res["compared_tokens"] == 4 + 2 + 3
    assert [t["prompt"] for t in res["near_ties"]] == [1] and res["near_ties"][0]["step"] == 1
    assert res["mismatches"] == [{"prompt": 2, "step": 2, "got": 0, "want": 9, "margin": 1.0}]
    assert compare_greedy([[1, 2]], [[1, 2, 3]], [[1.0, 1.0, 1.0]], 1e-4)["mismatches"] == [{"prompt": 0, "length": [2, 3]}]


def test_a_missing_engine_environment_names_the_command(monkeypatch, tmp_path):
    import megapuzzle.serving.engines as engines

    monkeypatch.setattr(engines, "REPO_ROOT", tmp_path)  # a checkout without the reader venvs
    monkeypatch.delenv("MEGAPUZZLE_TRANSFORMERS_OLDEST_PYTHON", raising=False)
    with pytest.raises(UserError, match=r"no transformers-oldest environment found; create it with "
                                        r"`tools/make_reader_venvs.sh transformers-oldest`") as e:
        require_python("transformers-oldest")
    assert "\n" not in str(e.value)
