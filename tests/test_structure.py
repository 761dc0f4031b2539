"""The layout's rules: imports run one way (the import-linter contracts of .importlinter, and what import-linter
cannot see: utils.py, the entry scripts, the tests), and breaking a rule fails."""
import ast
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

PACKAGES = ('analysis', 'config', 'datasets', 'engine', 'evaluation', 'models')
SCRIPTS = ('main_esvit', 'main_esvit_mnodes', 'eval_knn', 'eval_linear', 'run_analysis')
PROJECT_MODULES = set(PACKAGES) | set(SCRIPTS) | {'utils'}


def lint_imports(tree):
    """(exit status, output) of import-linter on the project at ``tree``."""
    code = 'import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))'
    done = subprocess.run([sys.executable, '-c', code], cwd=tree, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def imported_modules(path):
    """Top-level names of every module ``path`` imports (at any depth of the file, relative imports excluded)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names


def test_the_import_contracts_hold():
    status, output = lint_imports(ROOT)
    assert status == 0, output
    assert 'Contracts: 3 kept, 0 broken.' in output


@pytest.mark.parametrize('file,bad_import,contract', [
    ('models/head.py', 'import utils', 'models is a leaf'),
    ('evaluation/knn.py', 'from engine import losses', 'Packages import only the layers below them'),
    ('datasets/loader.py', 'import config', 'Packages import only the layers below them'),
    ('config/archs.py', 'import eval_knn', 'No package imports an entry script'),
])
def test_a_bad_import_breaks_its_contract(tmp_path, file, bad_import, contract):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns('*.zip', '__pycache__'))
    for name in ('utils', *SCRIPTS):
        shutil.copy(ROOT / f'{name}.py', tmp_path)
    shutil.copy(ROOT / '.importlinter', tmp_path)
    assert lint_imports(tmp_path)[0] == 0  # the copy is faithful
    with open(tmp_path / file, 'a') as f:
        f.write(f'\n{bad_import}\n')
    status, output = lint_imports(tmp_path)
    assert status != 0
    assert f'{contract}' in output and 'BROKEN' in output.split(contract)[1].splitlines()[0], output


def test_utils_imports_nothing_of_the_project():
    assert not imported_modules(ROOT / 'utils.py') & PROJECT_MODULES


def test_no_script_imports_another_script():
    for script in SCRIPTS:
        assert not imported_modules(ROOT / f'{script}.py') & (set(SCRIPTS) - {script}), script


def test_no_test_file_imports_another_test_file():
    test_files = {path.stem for path in (ROOT / 'tests').glob('test_*.py')}
    for path in (ROOT / 'tests').glob('*.py'):
        assert not imported_modules(path) & (test_files | {'conftest'}), path.name
