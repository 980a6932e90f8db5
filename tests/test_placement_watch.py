"""Which watched placement groups are given back: those Ray is rescheduling after their node died,
and the entries of groups already removed are dropped."""
from actors.placement_watch import broken


def test_a_rescheduling_group_is_lost_and_a_removed_or_unknown_one_is_gone():
    table = {"a": {"state": "CREATED"}, "b": {"state": "RESCHEDULING"}, "c": {"state": "REMOVED"},
             "d": {"state": "PENDING"}}
    lost, gone = broken(table, {"a", "b", "c", "d", "e"})
    assert lost == ["b"]
    assert sorted(gone) == ["c", "e"]
