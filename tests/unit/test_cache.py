"""The module cache: keys that change with what matters, atomic writes, the off switch."""

from flashmlir.compiler.cache import ModuleCache, cache_key, tool_versions


def test_key_depends_on_ir_target_flags_and_pipeline():
    base = cache_key("ir", "cpu", ("--a",), ("p",))
    assert base == cache_key("ir", "cpu", ("--a",), ("p",))
    assert len({base, cache_key("ir2", "cpu", ("--a",), ("p",)), cache_key("ir", "sm_80", ("--a",), ("p",)),
                cache_key("ir", "cpu", ("--b",), ("p",)), cache_key("ir", "cpu", ("--a",), ("q",))}) == 5


def test_versions_include_compiler_and_our_source():
    versions = tool_versions()
    assert set(versions) == {"flashmlir", "iree-base-compiler", "torch"}
    assert "+" in versions["flashmlir"]  # version + source fingerprint


def test_store_and_load_leave_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMLIR_DISABLE_CACHE", "0")
    cache = ModuleCache(tmp_path)
    assert cache.load("k") is None
    cache.store("k", b"vmfb bytes", {"target": "cpu"})
    assert cache.load("k") == (b"vmfb bytes", {"target": "cpu"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.vmfb"]


def test_a_module_without_its_summary_is_not_a_hit(tmp_path):
    (tmp_path / "k.vmfb").write_bytes(b"half of an entry")
    assert ModuleCache(tmp_path).load("k") is None


def test_disabled_cache_neither_reads_nor_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMLIR_DISABLE_CACHE", "1")
    cache = ModuleCache(tmp_path)
    cache.store("k", b"x", {})
    assert cache.load("k") is None and not list(tmp_path.iterdir())
