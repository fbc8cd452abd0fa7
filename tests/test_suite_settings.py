"""The test suite's own settings (tests/conftest.py): where pytest-xdist's workers run, and in which groups."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_RUN, pytest_xdist_auto_num_workers


@pytest.mark.parametrize(("cuda", "workers"), [(True, 0), (False, None)])
def test_a_visible_gpu_keeps_the_tests_in_one_process(monkeypatch, pytestconfig, cuda, workers) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert pytest_xdist_auto_num_workers(pytestconfig) == workers


def test_each_module_is_a_group_and_the_shared_run_one_more(request) -> None:
    """Every collected test is in one group: the shared run's where its module uses that run, else its module's."""
    by_module: dict[str, set[str]] = {}
    for item in request.session.items:
        by_module.setdefault(item.path.name, set()).update(m.args[0] for m in item.iter_markers("xdist_group"))
    assert by_module["test_suite_settings.py"] == {"test_suite_settings.py"}
    for name, groups in by_module.items():
        assert groups in ({name}, {SHARED_RUN}), name
