//! Ports of the libstdc++ (GCC 13) algorithms torch's CPU top-k calls, on `(value, column)`
//! pairs with `comp(a, b) = a.value > b.value` (no NaN reaches them). Positions are indices
//! into the slice; where C++ holds a value aside and moves a "hole", so do these. Which of
//! several equal logits torch keeps, and in what order, is whatever these do.

/// Whether torch's CPU top-k takes the `partial_sort` path for this `k` and row length.
#[inline]
pub(crate) fn uses_partial_sort(k: usize, n: usize) -> bool {
    k.saturating_mul(64) <= n
}

/// A queue element: the logit widened to `f32`, and its column.
pub(crate) type Elem = (f32, usize);

#[inline(always)]
fn comp(a: &Elem, b: &Elem) -> bool {
    a.0 > b.0
}

/// `std::__lg`: floor(log2(n)) for `n > 0`.
fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

/// `std::__push_heap(first, hole, top, value)`.
#[inline]
fn push_heap(q: &mut [Elem], mut hole: usize, top: usize, value: Elem) {
    while hole > top {
        let parent = (hole - 1) / 2;
        if !comp(&q[parent], &value) {
            break;
        }
        q[hole] = q[parent];
        hole = parent;
    }
    q[hole] = value;
}

/// `std::__adjust_heap(first, hole, len, value)`.
#[inline]
pub(crate) fn adjust_heap(q: &mut [Elem], mut hole: usize, len: usize, value: Elem) {
    let top = hole;
    let mut second = hole;
    while second < len.saturating_sub(1) / 2 {
        second = 2 * (second + 1);
        if comp(&q[second], &q[second - 1]) {
            second -= 1;
        }
        q[hole] = q[second];
        hole = second;
    }
    if len & 1 == 0 && len >= 2 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        q[hole] = q[second - 1];
        hole = second - 1;
    }
    push_heap(q, hole, top, value);
}

/// `std::__make_heap(q, q + len)`.
pub(crate) fn make_heap(q: &mut [Elem], len: usize) {
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let v = q[parent];
        adjust_heap(q, parent, len, v);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// `std::__pop_heap(q, q + last, q + result)`.
#[inline]
fn pop_heap(q: &mut [Elem], last: usize, result: usize) {
    let v = q[result];
    q[result] = q[0];
    adjust_heap(q, 0, last, v);
}

/// `std::__heap_select(q, q + middle, q + q.len())`.
fn heap_select(q: &mut [Elem], middle: usize) {
    make_heap(q, middle);
    for i in middle..q.len() {
        if comp(&q[i], &q[0]) {
            pop_heap(q, middle, i);
        }
    }
}

/// `std::__sort_heap(q, q + len)`.
pub(crate) fn sort_heap(q: &mut [Elem], len: usize) {
    let mut last = len;
    while last > 1 {
        last -= 1;
        pop_heap(q, last, last);
    }
}

/// `std::partial_sort(q, q + middle, q + q.len())`.
pub(crate) fn partial_sort(q: &mut [Elem], middle: usize) {
    heap_select(q, middle);
    sort_heap(q, middle);
}

/// `std::__move_median_to_first(result, a, b, c)`.
fn move_median_to_first(q: &mut [Elem], result: usize, a: usize, b: usize, c: usize) {
    let m = if comp(&q[a], &q[b]) {
        if comp(&q[b], &q[c]) {
            b
        } else if comp(&q[a], &q[c]) {
            c
        } else {
            a
        }
    } else if comp(&q[a], &q[c]) {
        a
    } else if comp(&q[b], &q[c]) {
        c
    } else {
        b
    };
    q.swap(result, m);
}

/// `std::__unguarded_partition(first, last, pivot)`.
fn unguarded_partition(q: &mut [Elem], mut first: usize, mut last: usize, pivot: usize) -> usize {
    loop {
        while comp(&q[first], &q[pivot]) {
            first += 1;
        }
        last -= 1;
        while comp(&q[pivot], &q[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        q.swap(first, last);
        first += 1;
    }
}

/// `std::__unguarded_partition_pivot(first, last)`.
fn unguarded_partition_pivot(q: &mut [Elem], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(q, first, first + 1, mid, last - 1);
    unguarded_partition(q, first + 1, last, first)
}

/// `std::__unguarded_linear_insert(last)`.
fn unguarded_linear_insert(q: &mut [Elem], mut last: usize) {
    let v = q[last];
    let mut next = last - 1;
    while comp(&v, &q[next]) {
        q[last] = q[next];
        last = next;
        next -= 1;
    }
    q[last] = v;
}

/// `std::__insertion_sort(first, last)`.
fn insertion_sort(q: &mut [Elem], first: usize, last: usize) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        if comp(&q[i], &q[first]) {
            let v = q[i];
            q.copy_within(first..i, first + 1);
            q[first] = v;
        } else {
            unguarded_linear_insert(q, i);
        }
    }
}

/// `std::__introselect(first, nth, last, depth)`.
fn introselect(q: &mut [Elem], mut first: usize, nth: usize, mut last: usize, mut depth: usize) {
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut q[first..last], nth + 1 - first);
            q.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(q, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(q, first, last);
}

/// `std::nth_element(q, q + nth, q + q.len())`.
pub(crate) fn nth_element(q: &mut [Elem], nth: usize) {
    let len = q.len();
    if len == 0 || nth == len {
        return;
    }
    introselect(q, 0, nth, len, 2 * lg(len));
}

/// `std::__introsort_loop(first, last, depth)`.
fn introsort_loop(q: &mut [Elem], first: usize, mut last: usize, mut depth: usize) {
    while last - first > 16 {
        if depth == 0 {
            partial_sort(&mut q[first..last], last - first);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(q, first, last);
        introsort_loop(q, cut, last, depth);
        last = cut;
    }
}

/// `std::__final_insertion_sort(first, last)`.
fn final_insertion_sort(q: &mut [Elem], first: usize, last: usize) {
    if last - first > 16 {
        insertion_sort(q, first, first + 16);
        for i in first + 16..last {
            unguarded_linear_insert(q, i);
        }
    } else {
        insertion_sort(q, first, last);
    }
}

/// `std::sort(q.begin(), q.end())`.
pub(crate) fn sort(q: &mut [Elem]) {
    let len = q.len();
    if len != 0 {
        introsort_loop(q, 0, len, 2 * lg(len));
        final_insertion_sort(q, 0, len);
    }
}
