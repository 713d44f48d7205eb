package main

// servePlatformErr is nil on Linux, the one system lupool serve runs on.
func servePlatformErr() error { return nil }
