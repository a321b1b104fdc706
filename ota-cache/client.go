package otacache

// Device side: what a device (and cmd/devicesim) does with an Offer —
// download it block-wise over CoAPS or with ranges over HTTPS, resuming
// where a previous attempt stopped, then verify the image against the
// vendor's signed manifest, not against anything the gateway says.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
)

// CoAPGetter is the part of a go-coap client connection FetchCoAP uses
// (*udp/client.Conn from dtls.Dial satisfies it). The connection must be
// dialled with block-wise transfer disabled, options.WithBlockwise(false,
// ...), so that each Get returns exactly one block and FetchCoAP controls
// which block comes next.
type CoAPGetter interface {
	Get(ctx context.Context, path string, opts ...message.Option) (*pool.Message, error)
}

// Fetched describes a finished download.
type Fetched struct {
	Size int64
	// ResumedAt is the offset the download resumed from (0: from scratch).
	ResumedAt int64
	// ETag as sent by the gateway (CoAP: 8 bytes; HTTPS: the quoted sha256).
	ETag string
}

// ErrChanged means the resource changed during a resumed transfer.
var ErrChanged = errors.New("firmware changed during the transfer: restart from the beginning")

// FetchCoAP downloads path into dst with Block2 requests of size szx,
// starting at the block that holds offset from (the bytes a previous,
// interrupted attempt already wrote), so a download resumes from any block.
// Blocks arrive in order, so dst may also be a sequential hasher that
// ignores offsets. maxSize bounds what is accepted.
func FetchCoAP(ctx context.Context, conn CoAPGetter, path string, dst io.WriterAt, from int64, szx blockwise.SZX, maxSize int64) (Fetched, error) {
	var res Fetched
	bs := szx.Size()
	num := from / bs
	res.ResumedAt = num * bs
	var etag []byte
	size := int64(-1)
	for {
		if err := ctx.Err(); err != nil {
			return res, fmt.Errorf("fetch %s at block %d: %w", path, num, err)
		}
		blk, err := blockwise.EncodeBlockOption(szx, num, false)
		if err != nil {
			return res, fmt.Errorf("fetch %s: block %d: %w", path, num, err)
		}
		buf := make([]byte, 4)
		n, _ := message.EncodeUint32(buf, blk)
		resp, err := conn.Get(ctx, path, message.Option{ID: message.Block2, Value: buf[:n]})
		if err != nil {
			return res, fmt.Errorf("fetch %s block %d: %w", path, num, err)
		}
		if resp.Code() != codes.Content {
			body, _ := resp.ReadBody()
			return res, fmt.Errorf("fetch %s block %d: gateway answered %v: %s", path, num, resp.Code(), body)
		}
		tag, _ := resp.Options().GetBytes(message.ETag)
		if etag == nil {
			etag = append([]byte(nil), tag...)
		} else if !bytes.Equal(tag, etag) {
			return res, fmt.Errorf("fetch %s block %d: ETag %x, earlier %x: %w", path, num, tag, etag, ErrChanged)
		}
		if s2, err := resp.Options().GetUint32(message.Size2); err == nil {
			size = int64(s2)
			if size > maxSize {
				return res, fmt.Errorf("fetch %s: Size2 %d larger than the %d accepted", path, size, maxSize)
			}
		}
		body, err := resp.ReadBody()
		if err != nil {
			return res, fmt.Errorf("fetch %s block %d: read payload: %w", path, num, err)
		}
		off, more := int64(0), false
		if b2, err := resp.Options().GetUint32(message.Block2); err == nil {
			rszx, rnum, rmore, err := blockwise.DecodeBlockOption(b2)
			if err != nil {
				return res, fmt.Errorf("fetch %s block %d: bad Block2 in response: %w", path, num, err)
			}
			off, more = rnum*rszx.Size(), rmore
			if off != num*bs {
				return res, fmt.Errorf("fetch %s: asked for offset %d, got block at %d", path, num*bs, off)
			}
		} else if num != 0 {
			return res, fmt.Errorf("fetch %s: block %d requested, whole resource returned", path, num)
		}
		if off+int64(len(body)) > maxSize {
			return res, fmt.Errorf("fetch %s: more than the %d bytes accepted", path, maxSize)
		}
		if _, err := dst.WriteAt(body, off); err != nil {
			return res, fmt.Errorf("fetch %s: write at %d: %w", path, off, err)
		}
		if !more {
			res.Size = off + int64(len(body))
			if size >= 0 && res.Size != size {
				return res, fmt.Errorf("fetch %s: got %d bytes, Size2 said %d", path, res.Size, size)
			}
			res.ETag = hex.EncodeToString(etag)
			return res, nil
		}
		if len(body) != int(bs) {
			return res, fmt.Errorf("fetch %s block %d: %d bytes in a non-final block of %d", path, num, len(body), bs)
		}
		num++
	}
}

// FetchHTTPS downloads url into dst, resuming with a Range request from
// offset from (what an earlier attempt wrote) when etag, the ETag of that
// attempt (for Bastion the quoted sha256), is known. If-Range makes the
// gateway send the whole image again if it changed; Fetched.ResumedAt
// then is 0 and the caller should truncate dst to Fetched.Size.
func FetchHTTPS(ctx context.Context, hc *http.Client, url string, dst io.WriterAt, from int64, etag string, maxSize int64) (Fetched, error) {
	var res Fetched
	off := from
	if etag == "" {
		off = 0
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return res, fmt.Errorf("fetch %s: %w", url, err)
	}
	if off > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-")
		req.Header.Set("If-Range", etag)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return res, fmt.Errorf("fetch %s: %w", url, err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		off = 0
	case http.StatusPartialContent:
		var start int64
		if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-", &start); err != nil || start != off {
			return res, fmt.Errorf("fetch %s: Content-Range %q does not start at %d", url, resp.Header.Get("Content-Range"), off)
		}
	default:
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return res, fmt.Errorf("fetch %s: HTTP %s: %s", url, resp.Status, strings.TrimSpace(string(msg)))
	}
	res.ResumedAt, res.ETag = off, resp.Header.Get("ETag")
	n, err := io.Copy(io.NewOffsetWriter(dst, off), io.LimitReader(resp.Body, maxSize-off+1))
	res.Size = off + n
	if err != nil {
		return res, fmt.Errorf("fetch %s after %d bytes: %w", url, res.Size, err)
	}
	if res.Size > maxSize {
		return res, fmt.Errorf("fetch %s: more than the %d bytes accepted", url, maxSize)
	}
	return res, nil
}

// VerifyImage is the device's check before installing: the vendor's
// COSE_Sign1 manifest in the offer must verify with vendorKey (the key the
// device was built with), describe the device's class and the offered
// version, and the image file must have the manifest's size and SHA-256.
// The gateway is not trusted for any of it.
func VerifyImage(f *os.File, o Offer, class Class, vendorKey crypto.PublicKey) (Manifest, error) {
	m, err := VerifyManifest(o.Manifest, vendorKey)
	if err != nil {
		return m, err
	}
	if m.VendorID != class.Vendor || m.ClassID != class.Model {
		return m, fmt.Errorf("manifest is for %s/%s, this device is %s", m.VendorID, m.ClassID, class)
	}
	if m.Version != o.Version || m.SequenceNumber != o.Sequence || m.ImageSize != o.Size || hex.EncodeToString(m.ImageDigest) != o.SHA256 {
		return m, errors.New("the offer's version, sequence, size or sha256 differ from the vendor's signed manifest")
	}
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f, 0, m.ImageSize+1))
	if err != nil {
		return m, fmt.Errorf("hash %s: %w", f.Name(), err)
	}
	if n != m.ImageSize || !bytes.Equal(h.Sum(nil), m.ImageDigest) {
		return m, fmt.Errorf("image %s (%d bytes, sha256 %x) does not match the signed manifest (%d bytes, %x): %w", f.Name(), n, h.Sum(nil), m.ImageSize, m.ImageDigest, ErrImageMismatch)
	}
	return m, nil
}

// MarshalStatusReport encodes a report for the gateway (CoAP POST
// payload or MQTT message), refusing what the gateway would refuse.
func MarshalStatusReport(st DeviceStatus) ([]byte, error) {
	if err := st.validate(); err != nil {
		return nil, err
	}
	type wire struct {
		State   string `json:"state"`
		Version string `json:"version,omitempty"`
		SHA256  string `json:"sha256,omitempty"`
		Detail  string `json:"detail,omitempty"`
	}
	return json.Marshal(wire{st.State, st.Version, st.SHA256, st.Detail})
}

// ReportStatusCoAP is the device side of ServeCoAPStatus: it POSTs the
// report to path (the gateway's status resource).
func ReportStatusCoAP(ctx context.Context, conn interface {
	Post(ctx context.Context, path string, contentFormat message.MediaType, payload io.ReadSeeker, opts ...message.Option) (*pool.Message, error)
}, path string, st DeviceStatus) error {
	b, err := MarshalStatusReport(st)
	if err != nil {
		return err
	}
	resp, err := conn.Post(ctx, path, message.AppJSON, bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("report status to %s: %w", path, err)
	}
	if resp.Code() != codes.Changed {
		body, _ := resp.ReadBody()
		return fmt.Errorf("report status to %s: gateway answered %v: %s", path, resp.Code(), body)
	}
	return nil
}
