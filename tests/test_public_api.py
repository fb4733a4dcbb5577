from __future__ import annotations

import gate_middleware


def test_all_is_sorted_and_complete() -> None:
    names = gate_middleware.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(gate_middleware, name), name
    public = {n for n in vars(gate_middleware) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(gate_middleware, n)).__name__ == "module"}
    assert public - modules - {"annotations"} == set(names) - {"__version__"}
