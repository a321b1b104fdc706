package otacache

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func mappedTestFile(t *testing.T, data []byte) (*os.File, *mapping) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	m, err := mapFile(f, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.unmap() })
	return f, m
}

func TestMappingReadsTheFile(t *testing.T) {
	data := make([]byte, 3*4096+100)
	for i := range data {
		data[i] = byte(i * 7)
	}
	_, m := mappedTestFile(t, data)
	got, err := io.ReadAll(io.NewSectionReader(m, 0, int64(len(data))))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes (err %v), want the file's %d", len(got), err, len(data))
	}
	buf := make([]byte, 1024)
	if n, err := m.ReadAt(buf, int64(len(data))-10); n != 10 || err != io.EOF {
		t.Errorf("ReadAt across the end: %d, %v; want 10, EOF", n, err)
	}
	if n, err := m.ReadAt(buf, int64(len(data))); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end: %d, %v; want 0, EOF", n, err)
	}
	if _, err := m.ReadAt(buf, -1); err == nil {
		t.Error("ReadAt at a negative offset succeeded")
	}
}

func TestMappingEmptyFileIsNotMapped(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "empty"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if m, err := mapFile(f, 0); err == nil {
		m.unmap()
		t.Fatal("an empty file was mapped")
	}
}

// A transfer in progress when the image is dropped gets an error, and
// unmap waits for copies in progress (run with -race).
func TestMappingUnmapDuringReads(t *testing.T) {
	data := bytes.Repeat([]byte("firmware"), 64<<10)
	_, m := mappedTestFile(t, data)
	var wg, reading sync.WaitGroup
	for range 4 {
		wg.Add(1)
		reading.Add(1)
		go func() {
			defer wg.Done()
			started := sync.OnceFunc(reading.Done)
			defer started()
			buf := make([]byte, 1024)
			for i := 0; i < 10000; i++ {
				if i == 1 {
					started()
				}
				n, err := m.ReadAt(buf, int64(i%512)*1024)
				if errors.Is(err, errUnmapped) {
					return
				}
				if err != nil || !bytes.Equal(buf[:n], data[(i%512)*1024:(i%512)*1024+n]) {
					t.Errorf("read %d: %d bytes, %v", i, n, err)
					return
				}
			}
		}()
	}
	reading.Wait() // every reader has copied once: unmap meets reads in progress
	if err := m.unmap(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if _, err := m.ReadAt(make([]byte, 8), 0); !errors.Is(err, errUnmapped) {
		t.Fatalf("read after unmap: %v, want errUnmapped", err)
	}
}

// A file cut short under the mapping makes the copy fault (SIGBUS); that
// must become this read's error, not the end of bastiond.
func TestMappingFileTruncatedUnderIt(t *testing.T) {
	data := bytes.Repeat([]byte{0xab}, 4*4096)
	f, m := mappedTestFile(t, data)
	if err := os.Truncate(f.Name(), 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1024)
	n, err := m.ReadAt(buf, 2*4096)
	if err == nil || errors.Is(err, io.EOF) {
		t.Fatalf("read past the cut: %d bytes, %v; want a fault turned into an error", n, err)
	}
	t.Logf("read past the cut: %v", err)
}
