"""The start-up report of megatron-core's optional fast paths: on this CPU machine
TransformerEngine, Apex and CUDA are absent and DALI (a test extra) is installed; the line says
what that leaves on the fallback path."""

import importlib.metadata

from megatron_finevit.platform.fast_paths import fast_path_line, fast_path_report


def test_report_names_what_is_installed_here():
    found = fast_path_report()
    assert found["transformer_engine"] == "absent" and found["apex"] == "absent"
    assert found["cuda"] == "absent"
    assert found["dali"] == importlib.metadata.version("nvidia-dali-cuda120")
    line = fast_path_line()
    assert line.startswith("fast paths: transformer_engine absent, apex absent")
    assert "FP8" in line and "torch Adam and norms" in line
