import vlpref


def test_all_is_honest() -> None:
    exported = set(vlpref.__all__)
    public = {name for name in dir(vlpref) if not name.startswith("_")}
    # Everything in __all__ exists, and every public class or function is in __all__.
    assert exported <= set(dir(vlpref))
    modules = {name for name in public if type(getattr(vlpref, name)).__name__ == "module"}
    # The two set-up calls that run when vlpref is imported are not API.
    set_up = {"apply_offline_defaults", "prefer_system_arrow_pool"}
    assert public - modules - set_up <= exported
