"""What `make imports` (tests/static_imports.py) fails on, judged on mypy's own wording (the
check itself runs mypy over the checkout; CI runs it)."""
from __future__ import annotations

from tests import static_imports as si

CLEAN = "Success: no issues found in 115 source files\n"
TYPE_ERRORS = ('synthgrad/coordinator/train.py:131: error: "Keys" has no attribute "folder"  [attr-defined]\n'
               "Found 1 error in 1 file (checked 115 source files)\n")


def test_both_of_mypys_summaries_say_how_many_files_it_checked():
    assert si.CHECKED.search(CLEAN).group(1) == "115"
    assert si.CHECKED.search(TYPE_ERRORS).group(1) == "115"
    assert si.CHECKED.search("Success: no issues found in 1 source file\n").group(1) == "1"
    assert si.CHECKED.search("mypy: can't read file 'nowhere': No such file or directory\n") is None


def test_type_errors_pass_and_missing_imports_of_own_code_fail():
    assert si.problems(CLEAN) == [] and si.problems(TYPE_ERRORS) == []  # not judged here
    missing = ['tests/x.py:3: error: Cannot find implementation or library stub for module named '
               '"synthgrad.common.gone"  [import-not-found]',
               'bench/y.py:1: error: Skipping analyzing "synthgrad.workers": module is installed, but missing '
               'library stubs or py.typed marker  [import-untyped]',
               'common/wire.py: error: Source file found twice under different module names: "common.wire" '
               'and "synthgrad.common.wire"']
    others = ['tests/x.py:4: error: Cannot find implementation or library stub for module named "yaml"  '
              '[import-not-found]']
    assert si.problems("\n".join(missing + others)) == missing


def test_a_name_the_projects_own_modules_do_not_define_fails(tmp_path):
    """A from-import names the module in mypy's message; an attribute read does not, and the
    line says whose attribute it is."""
    src = tmp_path / "user.py"
    src.write_text("import os\n"
                   "import synthgrad.common.wire\n"
                   "from synthgrad.common import wire as w\n"
                   "from tests import helpers\n"
                   "os.gone\n"
                   "w.gone\n"
                   "synthgrad.common.wire.gone\n"
                   "helpers.gone\n"
                   "x = w.Grad.gone\n")
    lines = [f'{src}:1: error: Module "synthgrad.common.wire" has no attribute "Gone"  [attr-defined]',
             f'{src}:2: error: Module "numpy" has no attribute "Gone"  [attr-defined]',
             *(f'{src}:{n}: error: Module has no attribute "gone"  [attr-defined]' for n in (5, 6, 7, 8)),
             f'{src}:9: error: "type[Grad]" has no attribute "gone"  [attr-defined]']
    assert si.problems("\n".join(lines)) == [lines[0], *lines[3:6]]
