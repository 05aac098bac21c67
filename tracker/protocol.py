"""The sans-I/O tracker protocol under its former single name, for code written against it.

The protocol now lives in three modules: :mod:`tracker.bencode` (bencoding and the
torrent edits), :mod:`tracker.announce` (records, query parsing, answers) and
:mod:`tracker.handout` (the peer handout policy).  New code imports from those;
``benchmarks/tracker_load.py`` still imports ``bdecode`` from here.
"""

from .announce import (DEFAULT_ZONE, EVENTS, MAX_QUERY_LEN, MAX_SCRAPE_HASHES, NODE_ID_RE, ZONE_RE, Announce, Peer,
                       SwarmCounts, decode_compact_peers, encode_announce, encode_failure, encode_scrape,
                       make_announce, normalize_ip, pack_addr, parse_announce, parse_scrape, validate_node_id)
from .bencode import ProtocolError, bdecode, bencode, set_announce, torrent_info_bytes
from .handout import BucketKey, bucket_key, bucket_peers, choose_peers, peer_tier, sample_peers

__all__ = [
    "DEFAULT_ZONE", "EVENTS", "MAX_QUERY_LEN", "MAX_SCRAPE_HASHES", "NODE_ID_RE", "ZONE_RE", "Announce", "BucketKey",
    "Peer", "ProtocolError", "SwarmCounts", "bdecode", "bencode", "bucket_key", "bucket_peers", "choose_peers",
    "decode_compact_peers", "encode_announce", "encode_failure", "encode_scrape", "make_announce", "normalize_ip",
    "pack_addr", "parse_announce", "parse_scrape", "peer_tier", "sample_peers", "set_announce", "torrent_info_bytes",
    "validate_node_id",
]
