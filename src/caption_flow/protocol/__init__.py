"""Wire protocol: typed messages and the Sans-I/O connection state machines.

Imports nothing else of captionflow except its error tree, and no asyncio.
"""

from caption_flow.protocol.messages import PROTOCOL_VERSION, Message, decode, encode

__all__ = ["PROTOCOL_VERSION", "Message", "decode", "encode"]
