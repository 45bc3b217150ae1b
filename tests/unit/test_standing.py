from node.standing import BanList


def test_a_ban_lasts_its_duration_then_ends() -> None:
    bans = BanList(duration=10)
    bans.ban("p", "bad block", now=100)
    assert bans.is_banned("p", now=109.9)
    assert not bans.is_banned("p", now=110)
    assert len(bans) == 0  # forgotten once over


def test_a_second_ban_never_shortens_the_first() -> None:
    bans = BanList(duration=10)
    bans.ban("p", "bad block", now=100, duration=1000)
    bans.ban("p", "slow", now=101)
    assert bans.is_banned("p", now=500)


def test_the_list_is_bounded_and_pushes_out_the_ban_ending_soonest() -> None:
    bans = BanList(duration=10, capacity=3)
    bans.ban("long", "x", now=0, duration=1000)
    bans.ban("short", "x", now=0, duration=5)
    bans.ban("mid", "x", now=0, duration=50)
    for i in range(100):  # a Sybil earning bans under fresh identities
        bans.ban(f"sybil{i}", "x", now=1, duration=20)
    assert len(bans) == 3
    assert bans.is_banned("long", now=2)
    assert not bans.is_banned("short", now=2)


def test_expired_bans_make_room_before_live_ones_are_pushed_out() -> None:
    bans = BanList(duration=10, capacity=2)
    bans.ban("a", "x", now=0, duration=1)
    bans.ban("b", "x", now=0, duration=100)
    bans.ban("c", "x", now=5)
    assert bans.is_banned("b", now=6) and bans.is_banned("c", now=6)
