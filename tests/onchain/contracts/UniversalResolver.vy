# pragma version ~=0.4.3
"""
@title UniversalResolver (test double)
@notice What web3.py's ENS module calls (at its fixed universal-resolver address, where the tests put this code in
        the genesis state): resolve(dnsName, calldata) and findResolver(dnsName) against a registry. Test-only:
        exact names (no wildcard parents), no CCIP-read.
@dev The code is placed at genesis, so no constructor runs: the registry is set once, by anyone, after deployment.
"""


interface Registry:
    def resolver(node: bytes32) -> address: view


MAX_NAME: constant(uint256) = 255
MAX_LABELS: constant(uint256) = 32
MAX_CALL: constant(uint256) = 1024
MAX_RESULT: constant(uint256) = 2048

registry: public(address)


@external
def set_registry(registry: address):
    assert self.registry == empty(address), "UniversalResolver: registry already set"
    self.registry = registry


@internal
@pure
def _namehash(name: Bytes[MAX_NAME]) -> bytes32:
    # DNS wire format: <len><label>...<0>; namehash folds labels from the right.
    offsets: DynArray[uint256, MAX_LABELS] = []
    i: uint256 = 0
    for _: uint256 in range(MAX_LABELS):
        if i >= len(name):
            break
        size: uint256 = convert(slice(name, i, 1), uint256)
        if size == 0:
            break
        offsets.append(i)
        i += 1 + size
    node: bytes32 = empty(bytes32)
    count: uint256 = len(offsets)
    for k: uint256 in range(count, bound=MAX_LABELS):
        offset: uint256 = offsets[count - 1 - k]
        size: uint256 = convert(slice(name, offset, 1), uint256)
        node = keccak256(concat(node, keccak256(slice(name, offset + 1, size))))
    return node


@internal
@view
def _resolver(node: bytes32) -> address:
    return staticcall Registry(self.registry).resolver(node)


@view
@external
def findResolver(name: Bytes[MAX_NAME]) -> (address, bytes32, uint256):
    node: bytes32 = self._namehash(name)
    return self._resolver(node), node, 0


@view
@external
def resolve(name: Bytes[MAX_NAME], data: Bytes[MAX_CALL]) -> (Bytes[MAX_RESULT], address):
    node: bytes32 = self._namehash(name)
    target: address = self._resolver(node)
    if target == empty(address):
        # The mainnet contract reverts here; web3.py turns that revert into "no record" (None, or "" for text).
        # eth-tester raises its own exception type for reverts, so the double answers "no record" directly.
        return b"", empty(address)
    result: Bytes[MAX_RESULT] = raw_call(target, data, max_outsize=MAX_RESULT, is_static_call=True)
    return result, target
