package paging

// SwapSafety is what MakeSwapSafe did for the process: a process that the
// kernel swaps through (lupool attach on a VM's host, lupool serve on a
// node holding paging space) must not itself wait for swap-in or for the
// kernel to write pages out through it.
//
//   - Locked: mlockall(MCL_CURRENT|MCL_FUTURE) succeeded: every page
//     mapped now (program text, heap, stacks) is resident and stays so,
//     and so will every page mapped later (the later mappings are locked
//     as they are first touched, MCL_ONFAULT, so that reserved but unused
//     address space costs nothing). A locked Go process never gives freed
//     heap back to the system (madvise fails on locked pages).
//   - IOFlusher: prctl(PR_SET_IO_FLUSHER) succeeded (Linux 5.6, needs
//     CAP_SYS_RESOURCE): the kernel does not recurse into I/O to reclaim
//     memory for the process's allocations, and throttles it as an I/O
//     flusher. IOFlusherThreads says whether every thread has it
//     (syscall.AllThreadsSyscall) or only the calling one and the threads
//     started from it later.
//
// Warnings say what could not be done and what to change.
type SwapSafety struct {
	Locked           bool
	IOFlusher        bool
	IOFlusherThreads string
	Warnings         []string
}
