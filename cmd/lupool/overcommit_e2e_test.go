package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"testing"
)

// TestConcurrentCreatesRespectOvercommit: creates racing each other do not
// all pass the overcommit limit, and every LU that is listed has a volume
// and an NBD export (none is left half made).
func TestConcurrentCreatesRespectOvercommit(t *testing.T) {
	d := newDaemon(t, "n1", "--overcommit", "1")
	d.start()
	var pool struct {
		CapacityBytes int64 `json:"capacity_bytes"`
	}
	if err := json.Unmarshal([]byte(d.mustCLI("pool", "status", "-o", "json")), &pool); err != nil {
		t.Fatal(err)
	}
	size := pool.CapacityBytes / 10 * 6 / 512 * 512 // 0.6 x capacity: one fits, two do not
	token := d.token()
	var wg sync.WaitGroup
	codes := make([]int, 4)
	for i := range codes {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			body, _ := json.Marshal(map[string]any{"name": fmt.Sprintf("race%d", i), "size_bytes": size})
			req, err := http.NewRequest("POST", "http://"+d.api+"/v1/lus", bytes.NewReader(body))
			if err != nil {
				t.Error(err)
				return
			}
			req.Header.Set("Authorization", "Bearer "+token)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			codes[i] = resp.StatusCode
		}(i)
	}
	wg.Wait()
	created := 0
	for _, c := range codes {
		switch c {
		case http.StatusCreated:
			created++
		case http.StatusInsufficientStorage:
		default:
			t.Errorf("create answered %d, want 201 or 507", c)
		}
	}
	if created != 1 {
		t.Fatalf("%d of 4 racing creates of 0.6x capacity passed an overcommit limit of 1x (codes %v), want exactly 1", created, codes)
	}
	lus := d.listLUs()
	if len(lus) != 1 {
		t.Fatalf("LU table %+v, want the one created LU", lus)
	}
	out := runTool(t, "nbdinfo", "--list", "--json", "nbd://"+d.nbd)
	if !bytes.Contains([]byte(out), []byte(`"`+lus[0].Name+`"`)) {
		t.Fatalf("created LU %s is not exported:\n%s", lus[0].Name, out)
	}
}
