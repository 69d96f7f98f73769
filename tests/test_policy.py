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
