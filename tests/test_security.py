"""Pure identity policy: port ACL decisions, identity changes, handle-kind masks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alpc import control
from alpc.errors import ProtocolError
from alpc.security import (
    HANDLE_KINDS,
    MAX_ACL_ENTRIES,
    HandleKind,
    PeerCred,
    PortAcl,
    identity_changed,
    kinds_from_mask,
    kinds_mask,
)

OWNER = 1000


def cred(uid: int, gid: int | None = None) -> PeerCred:
    return PeerCred(4242, uid, uid if gid is None else gid)


def test_default_acl_admits_only_the_owner() -> None:
    acl = PortAcl()
    assert acl.check(cred(OWNER), (), OWNER).allowed
    refused = acl.check(cred(1001), (), OWNER)
    assert not refused.allowed and "uid 1001 is not in the ACL" in refused.reason
    assert not acl.check(cred(0), (), OWNER).allowed  # root only when the owner says so


def test_root_and_everyone_are_opt_in() -> None:
    assert PortAcl(allow_root=True).check(cred(0), (), OWNER).allowed
    assert not PortAcl(allow_root=True).check(cred(1001), (), OWNER).allowed
    assert PortAcl(allow_everyone=True).check(cred(1001), (), OWNER).allowed


def test_uids_primary_and_supplementary_groups() -> None:
    acl = PortAcl(allow_uids={1001}, allow_gids={50})
    assert acl.check(cred(1001), (), OWNER).allowed
    assert acl.check(cred(1002, gid=50), (), OWNER).allowed            # primary gid
    assert acl.check(cred(1003), (7, 50), OWNER).allowed               # supplementary group
    assert not acl.check(cred(1003), (7, 8), OWNER).allowed


def test_deny_wins_over_every_allow_even_the_owner() -> None:
    acl = PortAcl(allow_everyone=True, deny_uids={1001}, deny_gids={66})
    assert not acl.check(cred(1001), (), OWNER).allowed
    assert "group 66 is denied" in acl.check(cred(1002), (66,), OWNER).reason
    assert not PortAcl(deny_uids={OWNER}).check(cred(OWNER), (), OWNER).allowed
    assert not PortAcl(allow_root=True, deny_gids={0}).check(cred(0), (), OWNER).allowed


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"allow_uids": {-1}}, "not a uid"),
    ({"allow_gids": {1 << 32}}, "not a uid"),
    ({"deny_uids": {True}}, "not a uid"),
    ({"allow_uids": set(range(MAX_ACL_ENTRIES + 1))}, "more than"),
    ({"allow_root": 1}, "must be a bool"),
])
def test_bad_acls_are_refused(kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        PortAcl(**kwargs)  # type: ignore[arg-type]


_IDS = st.frozensets(st.integers(0, 70), max_size=6)


@given(_IDS, _IDS, _IDS, _IDS, st.booleans(), st.booleans(), st.integers(0, 70), st.integers(0, 70),
       st.lists(st.integers(0, 70), max_size=5), st.integers(0, 70))
def test_acl_decision_matches_its_definition(allow_uids: frozenset[int], allow_gids: frozenset[int],
                                             deny_uids: frozenset[int], deny_gids: frozenset[int],
                                             allow_root: bool, everyone: bool, uid: int, gid: int,
                                             groups: list[int], owner: int) -> None:
    acl = PortAcl(allow_uids, allow_gids, deny_uids, deny_gids, allow_root, everyone)
    gids = {gid, *groups}
    denied = uid in deny_uids or bool(gids & deny_gids)
    allowed = (uid == owner or (uid == 0 and allow_root) or everyone or uid in allow_uids
               or bool(gids & allow_gids))
    assert acl.check(PeerCred(1, uid, gid), groups, owner).allowed == (allowed and not denied)
    # The wire form keeps every decision the same.
    again = control.AclSpec.of(acl).acl()
    assert again == acl


def test_acl_spec_from_a_peer_is_checked() -> None:
    with pytest.raises(ProtocolError, match="AclSpec"):
        control.AclSpec(allow_uids=(-5,)).acl()


def test_identity_change_is_uid_or_gid_never_pid() -> None:
    connected = PeerCred(10, 1000, 100)
    assert not identity_changed(connected, PeerCred(11, 1000, 100))  # a forked child of the same user
    assert identity_changed(connected, PeerCred(10, 0, 100))
    assert identity_changed(connected, PeerCred(10, 1000, 0))


@given(st.sets(st.sampled_from(list(HandleKind))))
def test_kinds_mask_roundtrip(kinds: set[HandleKind]) -> None:
    assert kinds_from_mask(kinds_mask(kinds)) == kinds


def test_kinds_mask_ignores_unknown_bits_and_refuses_unknown_names() -> None:
    assert kinds_from_mask(1 << 40) == frozenset()
    assert kinds_from_mask(kinds_mask(["file"]) | 1 << 63) == {HandleKind.FILE}
    with pytest.raises(ValueError):
        kinds_mask(["teleporter"])
    assert HANDLE_KINDS[0] is HandleKind.FILE  # wire order is append-only
