import vlpref


def test_all_is_honest() -> None:
    exported = set(vlpref.__all__)
    public = {name for name in dir(vlpref) if not name.startswith("_")}
    # Everything in __all__ exists, and every public class or function is in __all__.
    assert exported <= set(dir(vlpref))
    modules = {name for name in public if type(getattr(vlpref, name)).__name__ == "module"}
    assert public - modules - {"apply_offline_defaults"} <= exported
