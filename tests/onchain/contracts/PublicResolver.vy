# pragma version ~=0.4.3
"""
@title PublicResolver (test double)
@notice addr, name (reverse records) and text records, writable by the node's owner in the registry.
"""


interface Registry:
    def owner(node: bytes32) -> address: view


REGISTRY: immutable(Registry)

_addrs: HashMap[bytes32, address]
_names: HashMap[bytes32, String[255]]
_texts: HashMap[bytes32, HashMap[String[64], String[512]]]


@deploy
def __init__(registry: address):
    REGISTRY = Registry(registry)


@internal
@view
def _authorised(node: bytes32):
    assert staticcall REGISTRY.owner(node) == msg.sender, "PublicResolver: not the owner of the node"


@view
@external
def supportsInterface(interface_id: bytes4) -> bool:
    # ERC-165, addr(bytes32), name(bytes32), text(bytes32,string)
    return interface_id in [0x01ffc9a7, 0x3b3b57de, 0x691f3431, 0x59d1d43c]


@view
@external
def addr(node: bytes32) -> address:
    return self._addrs[node]


@view
@external
def name(node: bytes32) -> String[255]:
    return self._names[node]


@view
@external
def text(node: bytes32, key: String[64]) -> String[512]:
    return self._texts[node][key]


@external
def setAddr(node: bytes32, target: address):
    self._authorised(node)
    self._addrs[node] = target


@external
def setName(node: bytes32, new_name: String[255]):
    self._authorised(node)
    self._names[node] = new_name


@external
def setText(node: bytes32, key: String[64], text_value: String[512]):
    self._authorised(node)
    self._texts[node][key] = text_value
