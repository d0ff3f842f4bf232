"""Video: decoding trickle input, encoding and segmenting output. Knows nothing of WebRTC or gRPC."""
