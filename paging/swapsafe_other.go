//go:build !linux

package paging

// MakeSwapSafe does nothing outside Linux and says so.
func MakeSwapSafe() SwapSafety {
	return SwapSafety{Warnings: []string{"memory not locked and not an I/O flusher: only on Linux"}}
}
