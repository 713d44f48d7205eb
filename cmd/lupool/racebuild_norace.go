//go:build !race

package main

// raceBuild is true in a race-detector build.
const raceBuild = false
