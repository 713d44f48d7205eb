/* pagefill: the guest program of TestPagingVMSwaps. It fills more memory
 * than the guest has with a known pattern (every 8-byte word names its page,
 * its word and the pass), so that the kernel must swap most of it out, then
 * reads every page back and counts the pages that differ. Two passes: the
 * second rewrites every page (swap-in, then swap-out again) with another
 * pattern. Output on the console, one line each:
 *   PAGEFILL start pages=N
 *   PAGEFILL pass P fill|check PCT%
 *   PAGEFILL pass P bad=B
 *   PAGEFILL done pages=N bad=B
 * Built with gcc -static; usage: pagefill MIB */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t word(uint64_t page, uint64_t i, uint64_t pass) {
	uint64_t x = (page * 0x9E3779B97F4A7C15ull) ^ (i * 0xBF58476D1CE4E5B9ull) ^ (pass * 0x94D049BB133111EBull);
	return x ^ (x >> 31);
}

int main(int argc, char **argv) {
	if (argc != 2) {
		fprintf(stderr, "usage: pagefill MIB\n");
		return 2;
	}
	uint64_t pages = (uint64_t)atol(argv[1]) * 1024 * 1024 / PAGE;
	uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("PAGEFILL mmap");
		return 1;
	}
	printf("PAGEFILL start pages=%llu\n", (unsigned long long)pages);
	fflush(stdout);
	uint64_t total_bad = 0;
	for (uint64_t pass = 0; pass < 2; pass++) {
		for (uint64_t p = 0; p < pages; p++) {
			uint64_t *w = mem + p * WORDS;
			for (uint64_t i = 0; i < WORDS; i++)
				w[i] = word(p, i, pass);
			if ((p + 1) % (pages / 10) == 0) {
				printf("PAGEFILL pass %llu fill %llu%%\n", (unsigned long long)pass, (unsigned long long)((p + 1) * 100 / pages));
				fflush(stdout);
			}
		}
		uint64_t bad = 0;
		for (uint64_t p = 0; p < pages; p++) {
			uint64_t *w = mem + p * WORDS;
			for (uint64_t i = 0; i < WORDS; i++) {
				if (w[i] != word(p, i, pass)) {
					if (bad < 5)
						printf("PAGEFILL bad page %llu word %llu\n", (unsigned long long)p, (unsigned long long)i);
					bad++;
					break;
				}
			}
			if ((p + 1) % (pages / 10) == 0) {
				printf("PAGEFILL pass %llu check %llu%%\n", (unsigned long long)pass, (unsigned long long)((p + 1) * 100 / pages));
				fflush(stdout);
			}
		}
		printf("PAGEFILL pass %llu bad=%llu\n", (unsigned long long)pass, (unsigned long long)bad);
		fflush(stdout);
		total_bad += bad;
	}
	printf("PAGEFILL done pages=%llu bad=%llu\n", (unsigned long long)pages, (unsigned long long)total_bad);
	fflush(stdout);
	return total_bad == 0 ? 0 : 1;
}
