from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.build.elements import KILN_ELEMENTS, environment_files, hooks_by_phase, resolve, search_path, tree_hash
from kiln.model.errors import ElementError


def path_of(make_element: Callable[..., Path]) -> list[Path]:
    return [make_element.root]  # type: ignore[attr-defined]


def test_deps_expand_transitively(make_element: Callable[..., Path]) -> None:
    make_element("a", deps=["b"])
    make_element("b", deps=["c"])
    make_element("c")
    assert resolve(["a"], path_of(make_element)).names == ["a", "b", "c"]


def test_provides_satisfies_a_dependency(make_element: Callable[..., Path]) -> None:
    make_element("app", deps=["operating-system"])
    make_element("mydistro", provides=["operating-system"])
    resolved = resolve(["app", "mydistro"], path_of(make_element))
    assert resolved.names == ["app", "mydistro"]
    assert resolved.provided == {"operating-system": "mydistro"}


def test_missing_element_names_who_asked(make_element: Callable[..., Path]) -> None:
    make_element("a", deps=["ghost"])
    with pytest.raises(ElementError) as exc:
        resolve(["a"], path_of(make_element))
    assert "'ghost'" in str(exc.value) and "element 'a' (element-deps)" in str(exc.value)


def test_missing_requested_element(make_element: Callable[..., Path]) -> None:
    with pytest.raises(ElementError, match="asked for by the image spec"):
        resolve(["nope"], path_of(make_element))


def test_two_providers_conflict(make_element: Callable[..., Path]) -> None:
    make_element("x", provides=["thing"])
    make_element("y", provides=["thing"])
    with pytest.raises(ElementError, match="provided by both 'x' and 'y'"):
        resolve(["x", "y"], path_of(make_element))


def test_included_and_provided_conflict(make_element: Callable[..., Path]) -> None:
    make_element("thing")
    make_element("y", provides=["thing"])
    with pytest.raises(ElementError, match="'y' also provides it"):
        resolve(["thing", "y"], path_of(make_element))


def test_dependency_cycle_terminates(make_element: Callable[..., Path]) -> None:
    make_element("a", deps=["b"])
    make_element("b", deps=["a"])
    assert resolve(["a"], path_of(make_element)).names == ["a", "b"]


def test_escaping_names_rejected(make_element: Callable[..., Path]) -> None:
    make_element("a", deps=["../../etc"])
    with pytest.raises(ElementError, match="not a valid element name"):
        resolve(["a"], path_of(make_element))


def test_hooks_merged_and_sorted_in_c_locale(make_element: Callable[..., Path]) -> None:
    make_element("a", hooks={"install.d/50-a": "true", "install.d/Z-upper": "true"})
    make_element("b", hooks={"install.d/10-b": "true", "install.d/a-lower": "true", "root.d/01-r": "true"},
                 files={"install.d/patch.diff": "data", "install.d/README.md": "doc"})
    phases = hooks_by_phase(resolve(["a", "b"], path_of(make_element)))
    assert [h.name for h in phases["install.d"]] == ["10-b", "50-a", "Z-upper", "a-lower"]
    assert [h.element for h in phases["install.d"]] == ["b", "a", "a", "b"]
    assert [h.name for h in phases["root.d"]] == ["01-r"]
    assert phases["root.d"][0].in_chroot is False and phases["install.d"][0].in_chroot is True


def test_duplicate_hook_names_are_an_error(make_element: Callable[..., Path]) -> None:
    make_element("a", hooks={"install.d/50-same": "true"})
    make_element("b", hooks={"install.d/50-same": "true"})
    with pytest.raises(ElementError, match=r"install.d/50-same is shipped by both 'a' and 'b'"):
        hooks_by_phase(resolve(["a", "b"], path_of(make_element)))


def test_same_hook_name_in_different_phases_is_fine(make_element: Callable[..., Path]) -> None:
    make_element("a", hooks={"install.d/50-same": "true"})
    make_element("b", hooks={"post-install.d/50-same": "true"})
    hooks_by_phase(resolve(["a", "b"], path_of(make_element)))


def test_hook_without_run_bit_is_skipped_with_a_warning(make_element: Callable[..., Path],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    make_element("a", hooks={"install.d/50-x": "true", "install.d/60-y": "true"}, executable=False)
    make_element("b", hooks={"install.d/55-z": "true"})
    hooks = hooks_by_phase(resolve(["a", "b"], path_of(make_element)))["install.d"]
    assert [h.name for h in hooks] == ["55-z"]
    assert "element 'a': ignoring non-executable hook install.d/50-x" in caplog.text


def test_environment_files_sorted_by_name(make_element: Callable[..., Path]) -> None:
    make_element("a", files={"environment.d/20-a": "export A=1"})
    make_element("b", files={"environment.d/10-b": "export B=1"})
    names = [f.name for f in environment_files(resolve(["a", "b"], path_of(make_element)))]
    assert names == ["10-b", "20-a"]


def test_user_paths_come_before_kiln_elements(tmp_path: Path) -> None:
    (tmp_path / "cloud-init-cfg").mkdir()
    path = search_path([tmp_path], env="")
    assert path[0] == tmp_path.resolve() and path[-1] == KILN_ELEMENTS
    assert resolve(["cloud-init-cfg"], path).get("cloud-init-cfg").path == tmp_path.resolve() / "cloud-init-cfg"


def test_native_elements_always_come_from_kiln(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    (tmp_path / "package-installs").mkdir()
    resolved = resolve(["vm", "package-installs"], search_path([tmp_path], env=""))
    assert resolved.get("vm").path == KILN_ELEMENTS / "vm"
    assert resolved.get("package-installs").path == KILN_ELEMENTS / "package-installs"


def test_library_and_user_elements_skip_non_executable_hooks_alike(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "old/cleanup.d").mkdir(parents=True)
    (lib / "old/cleanup.d/99-disabled").write_text("#!/bin/bash\nexit 1\n")
    path = search_path([], env="", library=[lib])
    assert hooks_by_phase(resolve(["old"], path, library=[lib.resolve()]))["cleanup.d"] == []
    assert hooks_by_phase(resolve(["old"], search_path([lib], env="")))["cleanup.d"] == []


def test_missing_path_entry_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ElementError, match="is not a directory"):
        search_path([tmp_path / "nope"], env="")


def test_tree_hash_sees_bytes_and_modes_not_mtimes(tmp_path: Path) -> None:
    f = tmp_path / "hook"
    f.write_text("echo 1\n")
    f.chmod(0o755)
    h0 = tree_hash(tmp_path)
    import os

    os.utime(f, (1, 1))
    assert tree_hash(tmp_path) == h0
    f.chmod(0o744)
    h1 = tree_hash(tmp_path)
    assert h1 != h0
    f.write_text("echo 2\n")
    assert tree_hash(tmp_path) != h1


def test_shipped_elements_resolve() -> None:
    resolved = resolve(["debian", "vm", "cloud-init", "cloud-init-cfg", "growroot", "qemu-guest-agent",
                        "openssh-server"], search_path([], env=""))
    assert "cleanup" in resolved.names
    hooks_by_phase(resolved)
