"""Which modules the fork server preloads, and its settings from the environment."""

from __future__ import annotations

import pytest

from gpulane.jobs import OptionError
from gpulane.kernel.preload import ImportWatch, PreloadSettings, cell_imports, top_level


def test_top_level_packages_leave_out_the_standard_library_private_and_kernel_machinery():
    names = ["torch", "torch.nn", "numpy.linalg", "os", "json.decoder", "_pytest", "ipykernel.x"]
    assert top_level(names) == {"torch", "numpy"}


def test_cell_imports_in_order_once_each():
    code = "import torch.nn as nn, os\nfrom numpy import ones\nfrom . import mine\nimport torch\n"
    assert cell_imports(code) == ["torch", "numpy"]
    assert cell_imports("%%time\nimport torch") == []  # not plain Python: nothing guessed


def test_the_watch_follows_what_the_kernel_gained_since_it_loaded_gpulane():
    watch = ImportWatch(PreloadSettings(), baseline=["IPython", "zmq", "tornado", "numpy"])
    assert watch.wanted(["IPython", "numpy", "pandas", "pandas.core", "re"]) == ["pandas"]
    watch.add_cell("import sklearn\nimport pandas")
    assert watch.wanted(["pandas"]) == ["pandas", "sklearn"]


def test_a_list_is_preloaded_first_and_none_preloads_nothing():
    listed = PreloadSettings.from_environment({"GPULANE_PRELOAD": "torch, numpy"})
    assert (listed.auto, listed.modules) == (False, ("torch", "numpy"))
    assert ImportWatch(listed, []).wanted(["pandas"]) == ["torch", "numpy"]
    none = PreloadSettings.from_environment({"GPULANE_PRELOAD": "none"})
    watch = ImportWatch(none, [])
    watch.add_cell("import torch")
    assert watch.wanted(["pandas"]) == []


def test_settings_read_limits_and_name_a_malformed_variable():
    settings = PreloadSettings.from_environment(
        {
            "GPULANE_PRELOAD_LIMIT": "3",
            "GPULANE_PRELOAD_MEMORY": "512M",
            "GPULANE_FORKSERVER_IDLE": "90s",
            "GPULANE_FORKSERVER": "0",
        }
    )
    assert (settings.limit, settings.memory, settings.idle, settings.enabled) == (
        3,
        512 * 1024**2,
        90,
        False,
    )
    with pytest.raises(OptionError, match="GPULANE_PRELOAD_MEMORY='lots'"):
        PreloadSettings.from_environment({"GPULANE_PRELOAD_MEMORY": "lots"})
    with pytest.raises(OptionError, match="'torch;rm' is not a module name"):
        PreloadSettings.from_environment({"GPULANE_PRELOAD": "torch;rm"})
