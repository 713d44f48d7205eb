// Package bench is lupool's end-to-end benchmark suite: it starts lupool and
// the NBD servers a user would otherwise pick (nbdkit memory, nbdkit file,
// qemu-nbd) on 127.0.0.1, runs the same fio jobs (--ioengine=nbd) against
// each in alternation, and reports medians and same-run ratios.
//
// The machines it runs on are small and shared, so absolute numbers are not
// comparable between runs. Only ratios between servers measured in the same
// run, round by round, mean anything. A run is:
//
//	start every server (each on free loopback ports, its own temp dir)
//	prefill each export once (1 MiB sequential writes over the fio region)
//	for each workload:
//	    for round r in 1..rounds:
//	        for each server, starting at server r mod n:   (A B C, B C A, ...)
//	            fio --output-format=json JOBFILE  -> one Sample
//	stop the servers it started (SIGTERM, then SIGKILL after a grace period)
//
// Rounds pair up: the ratio subject/peer of round r compares two runs that
// ran next to each other in time. The report gives the median of those
// per-round ratios with their min and max.
//
// A server that exits during the run is reported as dead with the end of
// its log; its remaining rounds are recorded as gaps so that the pairing by
// round still holds for the others.
//
// The package is layered as: fio.go (parse fio JSON into a Sample),
// stats.go (medians and paired ratios), workload.go (the fio job catalog),
// server.go (launching and stopping servers), engine.go (lupool's NBD
// engine over an lu volume, served by the re-executed runner binary),
// runner.go (the rounds), report.go (markdown, JSON, gnuplot).
// cmd/nbdbench is the command line; run.sh builds and runs it.
package bench
