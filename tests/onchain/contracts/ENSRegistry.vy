# pragma version ~=0.4.3
"""
@title ENSRegistry (test double)
@notice The part of the ENS registry that name resolution reads: owners and resolvers of nodes. The deployer owns
        the root. Test-only: no TTLs, no operators, no events.
"""

_owners: HashMap[bytes32, address]
_resolvers: HashMap[bytes32, address]


@deploy
def __init__():
    self._owners[empty(bytes32)] = msg.sender


@view
@external
def owner(node: bytes32) -> address:
    return self._owners[node]


@view
@external
def resolver(node: bytes32) -> address:
    return self._resolvers[node]


@view
@external
def recordExists(node: bytes32) -> bool:
    return self._owners[node] != empty(address)


@external
def setSubnodeOwner(node: bytes32, label: bytes32, new_owner: address) -> bytes32:
    assert self._owners[node] == msg.sender, "ENSRegistry: not the owner of the parent"
    subnode: bytes32 = keccak256(concat(node, label))
    self._owners[subnode] = new_owner
    return subnode


@external
def setResolver(node: bytes32, new_resolver: address):
    assert self._owners[node] == msg.sender, "ENSRegistry: not the owner"
    self._resolvers[node] = new_resolver
