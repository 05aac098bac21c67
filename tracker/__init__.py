"""Registry (name:tag -> digest -> manifest + torrent) and BitTorrent tracker."""
