-- Shared by the bench_*.lua scripts of bench/bench.py (each dofile()s it first):
--   bench.now()             CLOCK_MONOTONIC in seconds: the clock of Python's time.monotonic(), so
--                           that bench.py can line these times up with its own (LuaJIT's ffi: wrk
--                           is built on LuaJIT, whose os.clock() is CPU time and os.time() whole seconds)
--   bench.share(path, n)    this thread's lines of an id file: lines index, index+n, index+2n ... so
--                           that no id is used by two threads
--   bench.headers(extra)    the headers given to wrk with -H (the bearer token) plus `extra`; for
--                           scripts that build requests with wrk.format(..., headers, ...), which
--                           does not add wrk.headers by itself
--   bench.header(h, name)   a response header, whatever its case (waitress sends X-Request-Id)
--   bench.verifying()       true for the one request() call that wrk makes on thread 0's script
--                           before any thread runs, to check what it returns (its
--                           script_verify_request): that request is never sent, so it must not
--                           use up an id or a place in a quota
--   bench.finish()          this thread has sent its quota: stop it and leave a marker file.
--                           wrk's main thread sleeps for the whole -d whatever its threads do, so
--                           bench.py sends wrk SIGINT once every thread has left its marker.
--   bench.write_records()   in done(): every thread's `records` lines into the file `out`
--   bench.report_with_records()  at a script's end: bench_report.lua's done(), then write_records()
-- Globals a script sets in init() for these: `out` (the records file, also the markers' prefix)
-- and `records` (a table of lines). `index` is the thread's number, set in setup().
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")

bench = { threads = {} }
local count = 0

function setup(thread)
    thread:set("index", count)
    count = count + 1
    table.insert(bench.threads, thread)
end

function bench.now()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

function bench.share(path, n)
    local ids, line_no = {}, 0
    for line in io.lines(path) do
        if line_no % n == index then
            ids[#ids + 1] = line
        end
        line_no = line_no + 1
    end
    return ids
end

function bench.headers(extra)
    local headers = {}
    for name, value in pairs(wrk.headers) do
        headers[name] = value
    end
    for name, value in pairs(extra or {}) do
        headers[name] = value
    end
    return headers
end

function bench.header(headers, name)
    local wanted = name:lower()
    for key, value in pairs(headers) do
        if key:lower() == wanted then
            return value
        end
    end
    return nil
end

local verified = false
function bench.verifying()
    if index == 0 and not verified then
        verified = true
        return true
    end
    return false
end

local finished = false
function bench.finish()
    if not finished then
        finished = true
        wrk.thread:stop()
        local marker = io.open(out .. ".done." .. index, "w")
        marker:close()
    end
end

function bench.write_records()
    local path = bench.threads[1]:get("out")
    local file = io.open(path, "w")
    for _, thread in ipairs(bench.threads) do
        for _, line in ipairs(thread:get("records")) do
            file:write(line, "\n")
        end
    end
    file:close()
end

bench.dir = debug.getinfo(1, "S").source:match("^@(.*/)") or ""

-- At the end of a script that keeps records: bench_report.lua's result line, then the records.
function bench.report_with_records()
    dofile(bench.dir .. "bench_report.lua")
    local report = done
    function done(summary, latency, requests)
        report(summary, latency, requests)
        bench.write_records()
    end
end
