import pytest

from relay.policy import forbidden_reason


@pytest.mark.parametrize(
    "ip,reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("224.0.0.1", "multicast"),
        ("100.100.100.200", "not a globally routable"),
        ("2002:a00:1::1", "private address inside"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private address inside"),
        ("fec0::1", "site"),
    ],
)
def test_forbidden(ip, reason):
    assert reason in forbidden_reason(ip)


@pytest.mark.parametrize("ip", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(ip):
    assert forbidden_reason(ip) is None


@pytest.mark.parametrize(
    "ip,reason",
    [
        ("::127.0.0.1", "loopback address inside"),  # IPv4-compatible
        ("64:ff9b::a00:1", "private address inside"),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", "loopback address inside"),
        ("64:ff9b:1::1", "NAT64 local-use"),
    ],
)
def test_wrapped_ipv4_forms(ip, reason):
    assert reason in forbidden_reason(ip)


def test_nat64_of_a_public_address_is_allowed():
    assert forbidden_reason("64:ff9b::808:808") is None


def test_egress_acl_opens_and_closes():
    from relay import ConfigError, TargetRefused
    from relay.policy import EgressPolicy

    policy = EgressPolicy.from_config(False, {"allow": ["10.1.0.0/16", "intranet.example"], "deny": ["203.0.113.0/24", "ads.example"]})
    check = policy.for_target("1.2.3.4")
    assert check("10.1.2.3") is None  # allowed network, though private
    assert "private" in check("10.2.0.1")
    assert "ACL" in check("203.0.113.9")  # denied, though public
    assert "ACL" in check("::ffff:203.0.113.9")
    assert check("93.184.216.34") is None
    assert policy.for_target("db.intranet.example")("10.9.9.9") is None  # an allowed name may be private
    with pytest.raises(TargetRefused):
        policy.for_target("tracker.ads.example")
    with pytest.raises(TargetRefused):
        policy.for_target("ADS.example.")
    assert EgressPolicy.from_config(True, None).for_target("x")("127.0.0.1") is None
    for bad in ({"allow": "10.0.0.0/8"}, {"block": []}, {"deny": ["10.0.0.0/33 x"]}):
        with pytest.raises(ConfigError):
            EgressPolicy.from_config(False, bad)
