//! Stub: decoding of request bodies (urlencoded with charsets, multipart, JSON).
