"""The project's modules import one way: each imports only modules of an earlier chapter, so
no import circle can form (a circle loads a module twice under `python module.py`, and every
class then exists in two copies). The chapters, in order:"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = [
    {"cli"},  # no project imports
    {"protocol", "tasks", "model", "muon"},
    {"tools", "compare"},
    {"traces"},
    {"executor"},
    {"asyncthink"},
    {"grpo", "diagnose", "bench", "chat"},
    {"train"},
    {"experiments", "bench_train"},
]


def project_imports(name, modules):
    """Every project module `name`.py imports, at the top or inside a function."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & modules - {name}


def test_every_module_has_a_chapter():
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))} - {"conftest"}
    assert modules == set().union(*LAYERS), modules ^ set().union(*LAYERS)


def test_imports_flow_one_way():
    modules = set().union(*LAYERS)
    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    upward = [(m, d) for m in modules for d in project_imports(m, modules) if layer[d] >= layer[m]]
    assert upward == [], f"imports of a module of the same or a later chapter: {upward}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    # the oracle itself: an import inside a function counts, a relative one does not
    tree_src = "import os\ndef f():\n    import executor\n    from asyncthink import record\n"
    (tmp_path / "probe.py").write_text(tree_src)
    global ROOT
    saved, ROOT = ROOT, str(tmp_path)
    try:
        assert project_imports("probe", {"executor", "asyncthink", "probe"}) == {"executor", "asyncthink"}
    finally:
        ROOT = saved
